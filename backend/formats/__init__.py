"""What models arrive as: Hugging Face folders and the Hub, GGUF files, tokenizers and chat templates, remote
OpenAI-compatible servers."""
