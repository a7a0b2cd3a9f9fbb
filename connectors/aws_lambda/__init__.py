"""AWS Lambda recipe: the handler for a DynamoDB stream event source mapping (handler), the event
shape conversion (event) and the fail-fast delivery of one invocation (delivery)."""
