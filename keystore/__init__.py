"""keystore: the agent's half of the controller's certificate authority."""
