"""Tests for twisted-nbd."""
