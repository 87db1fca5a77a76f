//! The catalog's identifiers: an API, an operation, a product, a subscription, each the index
//! of its entry in the catalog's table, typed so that one is never taken for another.

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub(crate) u32);

        impl $name {
            /// Its entry's place in the catalog's table.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }
    };
}

id!(
    /// An API of the catalog (`Catalog::apis`).
    ApiId
);
id!(
    /// An operation of its API (`Api::operations`).
    OperationId
);
id!(
    /// A product of the catalog (`Catalog::products`).
    ProductId
);
id!(
    /// A subscription of the catalog (`Catalog::subscriptions`).
    SubscriptionId
);
