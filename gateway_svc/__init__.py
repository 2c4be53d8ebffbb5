"""gateway_svc"""
