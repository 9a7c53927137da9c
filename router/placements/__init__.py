"""Placements shared between router replicas over Redis pub/sub.

wire.py      the message: a model's placements, msgpack, bounded on decode
service.py   the lifespan service: publishes this router's, indexes the others'
"""
