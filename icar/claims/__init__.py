"""Claims, above the analyses: one module per figure (icar/claims/<figure>.py) holds its claims, protocol, drawing,
typed numbers and verdict rules; icar.claims.registry finds them, icar.claims.record is what a figure run leaves."""
