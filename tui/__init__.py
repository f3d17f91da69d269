"""Terminal dashboard (Textual): watch a mistralrs-jax server's scheduler, KV cache, memory and
throughput, and chat with its model. `mistralrs-jax tui [--url URL | model args]`."""
