"""Front ends over the generation API: the Gradio web app (`tunesmith ui`) and the OpenAI-compatible API
(`tunesmith serve`). Models come from `ui.pool.ModelPool`; no model code lives in this package."""
