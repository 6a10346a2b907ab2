"""Setup step: `python -m components.curve_editor` copies Plotly.js next to the component's index.html."""
from components.curve_editor import ensure_plotly_js

print(f"wrote {ensure_plotly_js()}")
