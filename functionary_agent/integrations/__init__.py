"""Tools that come from elsewhere: MCP servers (`integrations.mcp`) and OpenAPI services (`integrations.openapi`).

Each module imports its optional dependencies itself, so `import functionary_agent` never pays for them.
"""
