// Starts GraphiQL against this server: queries over POST /graphql, subscriptions over
// graphql-ws on the same URL.
(function () {
  'use strict';
  const http = location.origin + '/graphql';
  const ws = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/graphql';
  const fetcher = GraphiQL.createFetcher({ url: http, subscriptionUrl: ws });
  const defaultQuery = `# Koubou GraphQL. Try:
query Status {
  systemStatus { activeWorkers pendingTasks completedTasks }
  tasks(limit: 5) { total tasks { id type status result } }
}

# mutation Submit {
#   submitTask(type: "code", prompt: "Create a REST API", priority: 9) { taskId status }
# }
#
# subscription Events {
#   systemEvents { event taskId status }
# }
`;
  const root = ReactDOM.createRoot(document.getElementById('graphiql'));
  root.render(React.createElement(GraphiQL, { fetcher, defaultQuery, defaultEditorToolsVisibility: true }));
})();
