// Swagger UI over the OpenAPI document `make proto` writes. "Authorize" takes a bearer token
// (make token), kept across reloads; "Try it out" calls this same origin.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  displayRequestDuration: true,
  // The default validator badge would ask validator.swagger.io, which a browser here cannot
  // reach (and the document is validated by make test).
  validatorUrl: null,
});
