"""attar runtime: the agent loop, the WebAssembly sandbox and on-device retrieval (no torch)."""
