"""File formats: the packed safetensors layout (``safetensors``)."""
