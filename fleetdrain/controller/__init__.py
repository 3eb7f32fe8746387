"""The drain controller's Lambda functions: thin handlers over the drain core (``drain/``)."""
