"""The bundled DeepSeek runner: model, checkpoint loading, evaluation (perplexity, KLD), generation."""
