"""gateway_guard: resilient outbound HTTP calls and honest gateway error pages."""
