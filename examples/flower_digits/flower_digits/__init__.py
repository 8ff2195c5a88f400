"""scikit-learn's digits among Flower SuperNodes, trained by traineval's client and server."""
