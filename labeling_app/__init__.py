"""The Gradio app and its store for collecting human preference pairs (see ARCHITECTURE.md)."""
