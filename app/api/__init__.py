"""HTTP routes beside the WebSocket endpoint: health, options, client secrets."""
