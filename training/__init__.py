"""Training recipes: encoder pretraining, classification, VideoLLM fine-tuning, synthetic data."""
