"""Servers the tests start for real: an MCP server (FastMCP) and an HTTP service with an OpenAPI document."""
