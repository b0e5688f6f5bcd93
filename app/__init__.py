"""The Gradio front end (installed as mmtok.app); it uses the public API only."""
