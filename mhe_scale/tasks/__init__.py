"""Task glue: wires data, encoder, head, engine and evaluation together; holds no math."""
