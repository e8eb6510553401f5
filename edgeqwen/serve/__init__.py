"""`edgeqwen serve`: the OpenAI-compatible HTTP server and its chat page.

May import: the shared core and formats; never measure or cli.
"""
