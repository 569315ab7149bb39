"""VideoLLM: VideoMAP encoder → projector → Hugging Face causal LM."""
