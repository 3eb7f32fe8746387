"""The drill's report: the model, the terminal table, the HTML timeline."""
