"""Federated learning on Flower: the server strategy, the ServerApp / ClientApp, and the
client-side controls."""
