"""The DashInfer engine behind dashchat's engine interface, and its model conversion."""
