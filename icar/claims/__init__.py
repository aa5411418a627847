"""Claims, above the analyses: each claim of the paper that icar checks, its figure, its numbers and its verdict."""
