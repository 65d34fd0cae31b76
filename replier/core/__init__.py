"""Replier core: settings."""
