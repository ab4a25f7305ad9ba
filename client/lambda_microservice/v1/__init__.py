"""Generated code of the lambda_microservice.v1 contract (`make proto` regenerates it)."""
