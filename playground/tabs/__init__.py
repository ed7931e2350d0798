"""One module per tab of the app (and one for the shared parameters panel). Each has a `build(...)` that makes the
tab's components inside the caller's `gr.Tab` and wires their events; playground/ui.py lays the tabs out."""
