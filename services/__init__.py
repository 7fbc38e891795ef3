"""Entry points of the two services (services/sharer, services/receiver); the code is lcflow.serving."""
