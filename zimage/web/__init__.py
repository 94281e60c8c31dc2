"""The web studio: the FastAPI server, the Gradio page, its panels and handlers."""
