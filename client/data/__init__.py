"""The shipped prompt set (prompts.jsonl), read with importlib.resources."""
