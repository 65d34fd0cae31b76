"""MaiTenant configurator: the FastAPI REST API for accounts, tenants, agents, API keys and history.

Run it with `python -m configurator`; build the app with `configurator.main.create_app()`.
"""
