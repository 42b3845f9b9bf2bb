"""Root of the test tree: pytest puts this folder on sys.path, so tests share `engine_helpers`."""
