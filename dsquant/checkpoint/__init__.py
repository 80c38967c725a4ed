"""Reading, writing and generating safetensors checkpoints, streamed tensor by tensor."""
