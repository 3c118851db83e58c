"""Using a model: the commands built on the generation engine (engine/generate.py).

chat.py (`tunelab chat` and `tunelab generate`: loading a run or a model for use), serve.py
(`tunelab serve`: an OpenAI-compatible HTTP API), export.py (`tunelab export`: adapter, merged
safetensors or GGUF). Importing this package imports nothing heavy.
"""
