"""The OpenAI-compatible HTTP server (Quart under hypercorn). `server.app.create_app(llm)`
builds the app; `server.app.serve(llm, args)` runs it for `mistralrs-server`."""
