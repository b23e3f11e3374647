"""The Gradio demo: ``python -m replan.app --backbone flux`` (needs ``pip install 'replan[app]'``)."""
