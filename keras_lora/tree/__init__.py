"""The model tree: layer paths (`walk`), rebuilding a model around
replacement layers (`rebuild`), and the only uses of private Keras API
(`keras_private`)."""
