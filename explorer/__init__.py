"""The keras_varinit explorer: a Streamlit page (app.py) over plain-Python helpers.

The helpers (settings and presets, run store, background worker, chart builders, the
at-initialization profile) import no Streamlit, so they can be tested and reused on their own.
"""
