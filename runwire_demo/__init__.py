"""runwire_demo"""
