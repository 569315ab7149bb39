"""Gradio chat demo."""
