"""Orchestration, the top layer: Hydra entry points and config registration, sweep jobs and their aggregation,
figure records, reports and REPRODUCTION.md. It may import every layer below; nothing imports it."""
