import type { Logger } from '../../common/logging.js';
import type { NodeFeed } from '../provisioning/node-feed.js';
import type { NodeRecord, Store } from '../store/store.js';

interface NodeChangeNotice {
  from: string;
  node: string;
  /** For a deletion, the node as it was (without its large or secret fields): it cannot be read any more. */
  deleted?: NodeRecord;
}

/**
 * Carries node changes between controllers, so that `metalcast node watch`
 * shows every change whichever controller made it. A change travels as a
 * 'node_changed' notification naming its origin and the node; the others
 * read the node and hand it to their local watchers. Progress-only updates
 * stay local: they are many, and the owner of a node serves them.
 */
export function relayNodeChanges(store: Store, feed: NodeFeed, controllerId: string, logger: Logger): () => void {
  feed.relayTo((change) => {
    const notice: NodeChangeNotice = { from: controllerId, node: change.node.uuid };
    if (change.deleted) {
      notice.deleted = {
        ...change.node,
        inventoryJson: null,
        deployJson: null,
        progressJson: null,
        agentTokenHash: null,
        agentApiToken: null,
        secrets: {},
      };
    }
    void store.notify('node_changed', JSON.stringify(notice));
  });
  return store.listen('node_changed', (payload) => {
    let message: NodeChangeNotice;
    try {
      message = JSON.parse(payload) as NodeChangeNotice;
    } catch {
      logger.warn({ payload: payload.slice(0, 200) }, 'ignored a malformed node change notification');
      return;
    }
    if (message.from === controllerId) return;
    if (message.deleted) {
      feed.publishRelayed({ node: message.deleted, deleted: true });
      return;
    }
    void store
      .getNode(message.node)
      .then((node) => {
        if (node) feed.publishRelayed({ node });
      })
      .catch((error: unknown) => logger.warn({ err: error, node: message.node }, 'could not read a node another controller changed'));
  });
}
