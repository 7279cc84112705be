"""The router: route policy, model choice and forwarding to model topics."""
