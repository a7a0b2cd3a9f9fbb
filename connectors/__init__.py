"""Everything that talks to a service: DynamoDB Streams, lease tables, OpenSearch, S3, Redis."""
