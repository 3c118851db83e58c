"""The model-side machinery that training, evaluation and use share, below all three.

generate.py (the generation engine: one decoding loop with the KV cache, run batched or streamed
piece by piece; every arm of the evaluation, chat, serve and the UI's playground decode through it),
adapter.py (start training from an existing PEFT adapter, refusing one that does not fit).
Importing this package imports nothing heavy.
"""
