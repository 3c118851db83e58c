"""Using a model: the generation engine and the commands built on it.

generate.py (the generation engine: one decoding loop with the KV cache, run batched or streamed
piece by piece through a generator; the evaluation's arms, chat, serve and the UI's playground all
decode through it), chat.py (`tunelab chat` and `tunelab generate`: loading a run or a model for
use), serve.py (`tunelab serve`: an OpenAI-compatible HTTP API), export.py (`tunelab export`:
adapter, merged safetensors or GGUF). Importing this package imports nothing heavy.
"""
