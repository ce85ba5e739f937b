"""What every layer may import: the project's exceptions and the seed recipe's facts. Imports nothing of the project."""
