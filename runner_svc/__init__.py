"""runner_svc"""
